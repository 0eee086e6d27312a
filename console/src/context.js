import { createContext } from 'preact';

// The namespace every page shows, and the session (who, and which actions).
export const Ns = createContext('default');
export const Session = createContext({ actions: {}, auth: false });
