// The page table: one entry per page; the header's navigation is built from it.
import { Overview } from './pages/Overview.jsx';
import { Agents } from './pages/Agents.jsx';
import { Tasks } from './pages/Tasks.jsx';
import { TaskPage } from './pages/Task.jsx';
import { Workflows, WorkflowPage } from './pages/Workflows.jsx';
import { DeadLetters } from './pages/DeadLetters.jsx';
import { StatePage } from './pages/State.jsx';

export const PAGES = [
  { path: '/', component: Overview, nav: 'Overview' },
  { path: '/agents', component: Agents, nav: 'Agents' },
  { path: '/tasks', component: Tasks, nav: 'Tasks' },
  { path: '/tasks/:id', component: TaskPage },
  { path: '/workflows', component: Workflows, nav: 'Workflows' },
  { path: '/workflows/:id', component: WorkflowPage },
  { path: '/dead-letters', component: DeadLetters, nav: 'Dead letters' },
  { path: '/state', component: StatePage, nav: 'State' },
];
